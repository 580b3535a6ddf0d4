/*
 * regs.c - exercises the register state: every general purpose register but rsp/rbp, all
 * vector registers at full width (zmm0-31 and k0-7 with AVX-512, else ymm0-15 with AVX, else
 * xmm0-15), two x87 stack registers, a non-default MXCSR (round toward zero, FTZ, DAZ) and
 * x87 control word (round up, 53-bit precision), and the gs base.
 * One asm block loads known values, spins (pause) until the SIGUSR2 handler sets a flag,
 * then stores every register to memory; C code compares. READY is written by a SIGALRM
 * handler only once the registers are loaded, so a dump always catches them live.
 * Self-test corruption edits the interrupted register state in the SIGUSR2 handler's
 * ucontext (and so in the real registers after sigreturn).
 *
 * Usage: regs LOGFILE [auto|avx|sse]   (use at most that register set; default auto)
 * Trigger: SIGUSR2.
 */
#include "common.h"

#include <asm/prctl.h>
#include <cpuid.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <ucontext.h>

#define MXCSR_TEST 0xffc0u /* all exceptions masked, RC=toward zero, FTZ, DAZ */
#define FCW_TEST 0x0a7fu   /* all exceptions masked, PC=53 bit, RC=up */
#define GS_TEST 0x12345000UL

struct regfile {
	uint64_t gpr[15]; /* rax rbx rcx rdx rsi rdi r8 r9 r10 r11 r12 r13 r14 r15 (14 used) */
	uint64_t pad;
	unsigned char vec[32][64];
	uint64_t k[8];
	unsigned char x87[2][16];
	uint32_t mxcsr;
	uint32_t fcw;
} __attribute__((aligned(64)));

static const char *const gpr_names[14] = {
	"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
};

static struct regfile in, out;
static volatile int regs_loaded;
static int vec_width, vec_count, has_k;
static unsigned int xoff_ymm, xoff_k, xoff_zmmhi, xoff_hi16;

#define OFF_GPR offsetof(struct regfile, gpr)
#define OFF_VEC offsetof(struct regfile, vec)
#define OFF_K offsetof(struct regfile, k)
#define OFF_X87 offsetof(struct regfile, x87)
#define OFF_MXCSR offsetof(struct regfile, mxcsr)
#define OFF_FCW offsetof(struct regfile, fcw)

/* Loads from in (pointed to by rax), GPRs last (rax last of all). */
#define LOAD_CTL                                        \
	"lea %[in], %%rax\n\t"                          \
	"ldmxcsr %c[omx](%%rax)\n\t"                    \
	"fldcw %c[ofcw](%%rax)\n\t"                     \
	"fldt %c[ox87]+16(%%rax)\n\t"                   \
	"fldt %c[ox87](%%rax)\n\t"
#define LOAD_GPR                                        \
	"mov %c[og]+8(%%rax), %%rbx\n\t"                \
	"mov %c[og]+16(%%rax), %%rcx\n\t"               \
	"mov %c[og]+24(%%rax), %%rdx\n\t"               \
	"mov %c[og]+32(%%rax), %%rsi\n\t"               \
	"mov %c[og]+40(%%rax), %%rdi\n\t"               \
	"mov %c[og]+48(%%rax), %%r8\n\t"                \
	"mov %c[og]+56(%%rax), %%r9\n\t"                \
	"mov %c[og]+64(%%rax), %%r10\n\t"               \
	"mov %c[og]+72(%%rax), %%r11\n\t"               \
	"mov %c[og]+80(%%rax), %%r12\n\t"               \
	"mov %c[og]+88(%%rax), %%r13\n\t"               \
	"mov %c[og]+96(%%rax), %%r14\n\t"               \
	"mov %c[og]+104(%%rax), %%r15\n\t"              \
	"mov %c[og](%%rax), %%rax\n\t"
#define SPIN                                            \
	"movl $1, %[loaded]\n\t"                        \
	"1: pause\n\t"                                  \
	"cmpl $0, %[flag]\n\t"                          \
	"je 1b\n\t"
#define STORE_GPR                                       \
	"mov %%rax, %[rax_out]\n\t"                     \
	"lea %[out], %%rax\n\t"                         \
	"mov %%rbx, %c[og]+8(%%rax)\n\t"                \
	"mov %%rcx, %c[og]+16(%%rax)\n\t"               \
	"mov %%rdx, %c[og]+24(%%rax)\n\t"               \
	"mov %%rsi, %c[og]+32(%%rax)\n\t"               \
	"mov %%rdi, %c[og]+40(%%rax)\n\t"               \
	"mov %%r8, %c[og]+48(%%rax)\n\t"                \
	"mov %%r9, %c[og]+56(%%rax)\n\t"                \
	"mov %%r10, %c[og]+64(%%rax)\n\t"               \
	"mov %%r11, %c[og]+72(%%rax)\n\t"               \
	"mov %%r12, %c[og]+80(%%rax)\n\t"               \
	"mov %%r13, %c[og]+88(%%rax)\n\t"               \
	"mov %%r14, %c[og]+96(%%rax)\n\t"               \
	"mov %%r15, %c[og]+104(%%rax)\n\t"
#define STORE_CTL                                       \
	"stmxcsr %c[omx](%%rax)\n\t"                    \
	"fnstcw %c[ofcw](%%rax)\n\t"                    \
	"fstpt %c[ox87](%%rax)\n\t"                     \
	"fstpt %c[ox87]+16(%%rax)\n\t"

#define OPERANDS                                                                          \
	: [rax_out] "=m"(out.gpr[0]), [loaded] "=m"(regs_loaded)                          \
	: [in] "m"(in), [out] "m"(out), [flag] "m"(laz_usr2_seen), [og] "i"(OFF_GPR),     \
	  [ov] "i"(OFF_VEC), [ok] "i"(OFF_K), [ox87] "i"(OFF_X87), [omx] "i"(OFF_MXCSR),  \
	  [ofcw] "i"(OFF_FCW)
#define GPR_CLOBBERS "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", \
		     "r13", "r14", "r15", "st", "st(1)", "cc", "memory"

#define REP16(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)
#define REP32(M) REP16(M) M(16) M(17) M(18) M(19) M(20) M(21) M(22) M(23) M(24) M(25) M(26) M(27) \
		 M(28) M(29) M(30) M(31)
#define REP8(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)

#define LD_XMM(i) "movdqu " #i "*64+%c[ov](%%rax), %%xmm" #i "\n\t"
#define ST_XMM(i) "movdqu %%xmm" #i ", " #i "*64+%c[ov](%%rax)\n\t"
#define LD_YMM(i) "vmovdqu " #i "*64+%c[ov](%%rax), %%ymm" #i "\n\t"
#define ST_YMM(i) "vmovdqu %%ymm" #i ", " #i "*64+%c[ov](%%rax)\n\t"
#define LD_ZMM(i) "vmovdqu64 " #i "*64+%c[ov](%%rax), %%zmm" #i "\n\t"
#define ST_ZMM(i) "vmovdqu64 %%zmm" #i ", " #i "*64+%c[ov](%%rax)\n\t"
#define LD_K(i) "kmovq " #i "*8+%c[ok](%%rax), %%k" #i "\n\t"
#define ST_K(i) "kmovq %%k" #i ", " #i "*8+%c[ok](%%rax)\n\t"

#define XMM_CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
		     "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"
#define HI_CLOBBERS "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", \
		    "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31", "k0", "k1", "k2", \
		    "k3", "k4", "k5", "k6", "k7"

static void spin_sse(void)
{
	__asm__ volatile(LOAD_CTL REP16(LD_XMM) LOAD_GPR SPIN STORE_GPR REP16(ST_XMM) STORE_CTL
			 OPERANDS : GPR_CLOBBERS, XMM_CLOBBERS);
}

__attribute__((target("avx")))
static void spin_avx(void)
{
	__asm__ volatile(LOAD_CTL REP16(LD_YMM) LOAD_GPR SPIN STORE_GPR REP16(ST_YMM) STORE_CTL
			 "vzeroupper\n\t" OPERANDS : GPR_CLOBBERS, XMM_CLOBBERS);
}

__attribute__((target("avx512f,avx512bw")))
static void spin_avx512(void)
{
	__asm__ volatile(LOAD_CTL REP32(LD_ZMM) REP8(LD_K) LOAD_GPR SPIN STORE_GPR REP32(ST_ZMM)
			 REP8(ST_K) STORE_CTL "vzeroupper\n\t" OPERANDS
			 : GPR_CLOBBERS, XMM_CLOBBERS, HI_CLOBBERS);
}

static unsigned int xsave_offset(unsigned int component)
{
	unsigned int a, b, c, d;

	__cpuid_count(0xd, component, a, b, c, d);
	(void)a;
	(void)c;
	(void)d;
	return b;
}

static void detect_cpu(const char *limit)
{
	unsigned int a, b, c, d, xcr0_lo = 0, xcr0_hi = 0;
	int osxsave, avx = 0, avx512 = 0;

	__cpuid(1, a, b, c, d);
	osxsave = (c >> 27) & 1;
	if (osxsave) {
		__asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
		avx = ((c >> 28) & 1) && (xcr0_lo & 0x6) == 0x6;
		__cpuid_count(7, 0, a, b, c, d);
		avx512 = avx && ((b >> 16) & 1) && ((b >> 30) & 1) && (xcr0_lo & 0xe0) == 0xe0;
	}
	(void)xcr0_hi;
	if (strcmp(limit, "avx") == 0 || strcmp(limit, "sse") == 0)
		avx512 = 0;
	if (strcmp(limit, "sse") == 0)
		avx = 0;
	vec_width = avx512 ? 64 : avx ? 32 : 16;
	vec_count = avx512 ? 32 : 16;
	has_k = avx512;
	if (avx)
		xoff_ymm = xsave_offset(2);
	if (avx512) {
		xoff_k = xsave_offset(5);
		xoff_zmmhi = xsave_offset(6);
		xoff_hi16 = xsave_offset(7);
	}
}

/* Flip one bit of the interrupted register state, which sigreturn then loads. */
static void corrupt_context(ucontext_t *uc)
{
	unsigned char *xs = (unsigned char *)uc->uc_mcontext.fpregs;

	if (laz_corrupt("gpr"))
		uc->uc_mcontext.gregs[REG_R12] ^= 1;
	if (laz_corrupt("gpr_rax"))
		uc->uc_mcontext.gregs[REG_RAX] ^= 1 << 20;
	if (laz_corrupt("xmm"))
		uc->uc_mcontext.fpregs->_xmm[5].element[0] ^= 1;
	if (laz_corrupt("mxcsr"))
		uc->uc_mcontext.fpregs->mxcsr ^= 0x2000;
	if (laz_corrupt("fpucw"))
		uc->uc_mcontext.fpregs->cwd ^= 0x0400;
	if (laz_corrupt("x87"))
		uc->uc_mcontext.fpregs->_st[1].significand[0] ^= 1;
	if (vec_width >= 32 && laz_corrupt("ymm"))
		xs[xoff_ymm + 16 * 5 + 3] ^= 1;
	if (has_k && laz_corrupt("zmm"))
		xs[xoff_zmmhi + 32 * 6 + 7] ^= 1;
	if (has_k && laz_corrupt("zmm_hi16"))
		xs[xoff_hi16 + 64 * 3 + 60] ^= 1;
	if (has_k && laz_corrupt("opmask"))
		xs[xoff_k + 8 * 3 + 1] ^= 1;
}

static void usr2_handler(int sig, siginfo_t *si, void *ctx)
{
	(void)sig;
	(void)si;
	if (getenv("LAZ_SELFTEST_CORRUPT"))
		corrupt_context(ctx);
	laz_usr2_seen = 1;
}

static void alarm_handler(int sig)
{
	static const char ready[] = "READY\n";
	struct itimerval it = { .it_value = { .tv_sec = 0, .tv_usec = 20000 } };

	(void)sig;
	if (regs_loaded)
		laz_write_all(laz_log_fd, ready, sizeof(ready) - 1);
	else
		setitimer(ITIMER_REAL, &it, NULL);
}

static void setup_values(void)
{
	long double st0 = 1.25L, st1 = -3.5e100L;
	int i;

	for (i = 0; i < 15; i++)
		in.gpr[i] = laz_mix(0x6501 + (uint64_t)i);
	laz_fill(in.vec, sizeof(in.vec), 0x7ec);
	for (i = 0; i < 8; i++)
		in.k[i] = laz_mix(0x4b00 + (uint64_t)i);
	memcpy(in.x87[0], &st0, 10);
	memcpy(in.x87[1], &st1, 10);
	in.mxcsr = MXCSR_TEST;
	in.fcw = FCW_TEST;
}

static void verify(void)
{
	int i;

	for (i = 0; i < 14; i++)
		LAZ_CHECK(out.gpr[i] == in.gpr[i], "%s = %#lx, expected %#lx", gpr_names[i],
			  (unsigned long)out.gpr[i], (unsigned long)in.gpr[i]);
	for (i = 0; i < vec_count; i++) {
		int b;

		for (b = 0; b < vec_width; b++)
			if (out.vec[i][b] != in.vec[i][b])
				break;
		if (b < vec_width)
			laz_failf("%s%d differs at byte %d", vec_width == 64 ? "zmm" : vec_width == 32 ? "ymm" : "xmm",
				  i, b);
	}
	for (i = 0; has_k && i < 8; i++)
		LAZ_CHECK(out.k[i] == in.k[i], "k%d = %#lx, expected %#lx", i, (unsigned long)out.k[i],
			  (unsigned long)in.k[i]);
	LAZ_CHECK(memcmp(out.x87[0], in.x87[0], 10) == 0, "x87 st0 differs");
	LAZ_CHECK(memcmp(out.x87[1], in.x87[1], 10) == 0, "x87 st1 differs");
	LAZ_CHECK(out.mxcsr == MXCSR_TEST, "mxcsr = %#x, expected %#x", out.mxcsr, MXCSR_TEST);
	LAZ_CHECK((out.fcw & 0xffff) == FCW_TEST, "x87 control word = %#x, expected %#x", out.fcw & 0xffff,
		  FCW_TEST);
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	struct itimerval it = { .it_value = { .tv_sec = 0, .tv_usec = 20000 } };
	unsigned long gs = 0;
	uint32_t mxcsr_default = 0x1f80;
	uint16_t fcw_default = 0x037f;
	sigset_t set;
	char points[128];

	laz_init(argc, argv);
	detect_cpu(argc > 2 ? argv[2] : "auto");
	setup_values();
	if (syscall(SYS_arch_prctl, ARCH_SET_GS, GS_TEST))
		laz_die("arch_prctl ARCH_SET_GS");

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = usr2_handler;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR2, &sa, NULL))
		laz_die("sigaction SIGUSR2");
	sa.sa_handler = alarm_handler;
	sa.sa_flags = 0;
	if (sigaction(SIGALRM, &sa, NULL))
		laz_die("sigaction SIGALRM");

	snprintf(points, sizeof(points), "gpr gpr_rax xmm mxcsr fpucw x87 gs%s%s",
		 vec_width >= 32 ? " ymm" : "", has_k ? " zmm zmm_hi16 opmask" : "");
	laz_points = points;
	laz_log("# corrupt-points: %s", points);
	laz_log("# vector registers: %d x %d bytes%s", vec_count, vec_width, has_k ? ", k0-k7" : "");

	/* READY comes from alarm_handler once the asm block has loaded the registers. */
	if (setitimer(ITIMER_REAL, &it, NULL))
		laz_die("setitimer");
	sigemptyset(&set);
	sigaddset(&set, SIGUSR2);
	sigprocmask(SIG_UNBLOCK, &set, NULL);

	if (has_k)
		spin_avx512();
	else if (vec_width == 32)
		spin_avx();
	else
		spin_sse();

	__asm__ volatile("ldmxcsr %0\n\tfldcw %1" : : "m"(mxcsr_default), "m"(fcw_default));
	if (laz_corrupt("gs"))
		syscall(SYS_arch_prctl, ARCH_SET_GS, GS_TEST + 4096);
	verify();
	if (syscall(SYS_arch_prctl, ARCH_GET_GS, &gs) || gs != GS_TEST)
		laz_failf("gs base = %#lx, expected %#lx", gs, GS_TEST);
	laz_finish();
}
