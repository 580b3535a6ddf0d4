/*
 * regs.c - exercises the register state: every general purpose register but rsp/rbp, all
 * vector registers at full width (zmm0-31 and k0-7 with AVX-512, else ymm0-15 with AVX, else
 * xmm0-15), two x87 stack registers, a non-default MXCSR (round toward zero, FTZ, DAZ) and
 * x87 control word (round up, 53-bit precision), and the gs base.
 * Where the CPU and kernel offer AMX: the permission for tile data (arch_prctl ARCH_REQ_XCOMP_PERM,
 * Documentation/arch/x86/xstate.rst), a palette-1 tile configuration and tmm0-7, loaded before
 * the spin and stored after it; after restore the tiles, their configuration and the permission
 * must be back, and a further tile instruction (tilezero) must still work (no SIGILL).
 * The log line "# parts: ..." names what ran (avx512|avx|sse, then amx or amx-perm).
 * One asm block loads known values, spins (pause) until the SIGUSR2 handler sets a flag,
 * then stores every register to memory; C code compares. READY is written by a SIGALRM
 * handler only once the registers are loaded, so a dump always catches them live.
 * Self-test corruption edits the interrupted register state in the SIGUSR2 handler's
 * ucontext (and so in the real registers after sigreturn).
 *
 * Usage: regs LOGFILE [auto|noamx|amxperm|avx|sse]
 *   auto: everything the CPU has; noamx: no tile permission (and it must not appear after restore);
 *   amxperm: tile permission but no tile ever used; avx, sse: at most that register set, no AMX.
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

#ifndef ARCH_GET_XCOMP_SUPP
#define ARCH_GET_XCOMP_SUPP 0x1021
#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#endif
#define XFEATURE_XTILECFG 17
#define XFEATURE_XTILEDATA 18
#define XTILE_MASK ((1UL << XFEATURE_XTILECFG) | (1UL << XFEATURE_XTILEDATA))
#define TILE_ROWS 16
#define TILE_COLSB 64
#define TILE_BYTES (TILE_ROWS * TILE_COLSB)

/* The 64-byte LDTILECFG operand; reserved bytes must be zero or ldtilecfg faults. */
struct tilecfg {
	uint8_t palette;
	uint8_t start_row;
	uint8_t reserved[14];
	uint16_t colsb[16];
	uint8_t rows[16];
} __attribute__((packed, aligned(64)));

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

/* AMX: amx_cpu = CPU and kernel offer tiles; use_tiles = tiles loaded; want_perm = permission asked for. */
static int amx_cpu, use_tiles, want_perm;
static unsigned int xoff_tilecfg, xoff_tiledata;
static struct tilecfg tcfg_in, tcfg_out;
static unsigned char tiles_in[8][TILE_BYTES] __attribute__((aligned(64)));
static unsigned char tiles_out[8][TILE_BYTES] __attribute__((aligned(64)));
static unsigned char tile_zero_out[TILE_BYTES] __attribute__((aligned(64)));

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

/*
 * Tile instructions in asm with explicit memory operands: the compiler never uses tiles itself, so
 * the tiles stay as loaded across the C code between these blocks and the spin.
 */
#define TILE_LD(i) "tileloadd (%[t], %[stride], 1), %%tmm" #i "\n\tadd %[step], %[t]\n\t"
#define TILE_ST(i) "tilestored %%tmm" #i ", (%[t], %[stride], 1)\n\tadd %[step], %[t]\n\t"

static void tiles_load(void)
{
	unsigned char *t = &tiles_in[0][0];

	__asm__ volatile("ldtilecfg %[cfg]\n\t" REP8(TILE_LD)
			 : [t] "+r"(t)
			 : [cfg] "m"(tcfg_in), [stride] "r"((long)TILE_COLSB), [step] "i"(TILE_BYTES),
			   "m"(tiles_in)
			 : "cc");
}

static void tiles_store(void)
{
	unsigned char *t = &tiles_out[0][0];

	__asm__ volatile("sttilecfg %[cfg]\n\t" REP8(TILE_ST)
			 : [t] "+r"(t), [cfg] "=m"(tcfg_out), "=m"(tiles_out)
			 : [stride] "r"((long)TILE_COLSB), [step] "i"(TILE_BYTES)
			 : "cc");
}

/* More tile instructions after the restore (configure, zero tmm3, store it, release): SIGILL here means
 * the task has no tile permission; in amxperm mode they are the first tile use of the restored task. */
static void tile_zero_store(void)
{
	__asm__ volatile("ldtilecfg %[cfg]\n\ttilezero %%tmm3\n\ttilestored %%tmm3, (%[t], %[stride], 1)\n\t"
			 "tilerelease"
			 : "=m"(tile_zero_out)
			 : [cfg] "m"(tcfg_in), [t] "r"(tile_zero_out), [stride] "r"((long)TILE_COLSB));
}

/* The palette-1 shape this target uses: 8 tiles of 16 rows x 64 bytes (CPUID leaf 0x1d). */
static int amx_palette1_fits(void)
{
	unsigned int a, b, c, d;

	__cpuid_count(0x1d, 0, a, b, c, d);
	if (a < 1)
		return 0;
	__cpuid_count(0x1d, 1, a, b, c, d);
	(void)d;
	return (a >> 16) >= TILE_BYTES && (b & 0xffff) >= TILE_COLSB && (b >> 16) >= 8 &&
	       (c & 0xffff) >= TILE_ROWS;
}

static unsigned long xcomp(int option)
{
	unsigned long v = 0;

	if (syscall(SYS_arch_prctl, option, &v))
		return 0;
	return v;
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
	int osxsave, avx = 0, avx512 = 0, amx_tile = 0;

	__cpuid(1, a, b, c, d);
	osxsave = (c >> 27) & 1;
	if (osxsave) {
		__asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
		avx = ((c >> 28) & 1) && (xcr0_lo & 0x6) == 0x6;
		__cpuid_count(7, 0, a, b, c, d);
		avx512 = avx && ((b >> 16) & 1) && ((b >> 30) & 1) && (xcr0_lo & 0xe0) == 0xe0;
		amx_tile = (d >> 24) & 1;
	}
	(void)xcr0_hi;
	/* AMX needs the CPU (CPUID 7 EDX bit 24), the OS (XCR0 bits 17-18) and the kernel's consent. */
	amx_cpu = amx_tile && (xcr0_lo & XTILE_MASK) == XTILE_MASK &&
		  (xcomp(ARCH_GET_XCOMP_SUPP) & XTILE_MASK) == XTILE_MASK && amx_palette1_fits();
	want_perm = amx_cpu && (strcmp(limit, "auto") == 0 || strcmp(limit, "amxperm") == 0);
	use_tiles = want_perm && strcmp(limit, "auto") == 0;
	if (use_tiles) {
		xoff_tilecfg = xsave_offset(XFEATURE_XTILECFG);
		xoff_tiledata = xsave_offset(XFEATURE_XTILEDATA);
	}
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
	/* The frame holds the tiles (standard XSAVE layout) since they are not in their initial state. */
	if (use_tiles && laz_corrupt("tmm"))
		xs[xoff_tiledata + 5 * TILE_BYTES + 77] ^= 1;
	if (use_tiles && laz_corrupt("tilecfg"))
		xs[xoff_tilecfg + offsetof(struct tilecfg, rows) + 6] = TILE_ROWS / 2;
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
	laz_fill(tiles_in, sizeof(tiles_in), 0x7133);
	memset(&tcfg_in, 0, sizeof(tcfg_in));
	tcfg_in.palette = 1;
	for (i = 0; i < 8; i++) {
		tcfg_in.colsb[i] = TILE_COLSB;
		tcfg_in.rows[i] = TILE_ROWS;
	}
}

/* After the restore: tiles, their configuration, the permission, and a tile instruction that works. */
static void verify_amx(void)
{
	unsigned long perm = xcomp(ARCH_GET_XCOMP_PERM);
	int i;

	if (use_tiles) {
		LAZ_CHECK(memcmp(&tcfg_out, &tcfg_in, sizeof(tcfg_in)) == 0, "tile configuration differs");
		for (i = 0; i < 8; i++) {
			if (memcmp(tiles_out[i], tiles_in[i], TILE_BYTES) != 0) {
				int b = 0;

				while (tiles_out[i][b] == tiles_in[i][b])
					b++;
				laz_failf("tmm%d differs at byte %d", i, b);
			}
		}
	}
	if (want_perm) {
		LAZ_CHECK((perm & XTILE_MASK) == XTILE_MASK, "AMX tile permission lost: ARCH_GET_XCOMP_PERM = %#lx",
			  perm);
		if ((perm & XTILE_MASK) == XTILE_MASK) {
			memset(tile_zero_out, 0xa5, sizeof(tile_zero_out));
			tile_zero_store();
			for (i = 0; i < TILE_BYTES && tile_zero_out[i] == 0; i++)
				;
			LAZ_CHECK(i == TILE_BYTES, "tilezero + tilestored left byte %d = %#x", i, tile_zero_out[i]);
		}
	} else if (amx_cpu) {
		LAZ_CHECK(!(perm & (1UL << XFEATURE_XTILEDATA)),
			  "AMX tile permission granted that the process never asked for: %#lx", perm);
	}
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

	snprintf(points, sizeof(points), "gpr gpr_rax xmm mxcsr fpucw x87 gs%s%s%s%s",
		 vec_width >= 32 ? " ymm" : "", has_k ? " zmm zmm_hi16 opmask" : "", use_tiles ? " tmm tilecfg" : "",
		 amx_cpu && !want_perm ? " xcomp_perm" : "");
	laz_points = points;
	laz_log("# corrupt-points: %s", points);
	laz_log("# vector registers: %d x %d bytes%s", vec_count, vec_width, has_k ? ", k0-k7" : "");
	laz_log("# parts: %s%s", has_k ? "avx512" : vec_width == 32 ? "avx" : "sse",
		use_tiles ? " amx" : want_perm ? " amx-perm" : "");
	if (want_perm && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA))
		laz_die("arch_prctl ARCH_REQ_XCOMP_PERM");

	/* READY comes from alarm_handler once the asm block has loaded the registers. */
	if (setitimer(ITIMER_REAL, &it, NULL))
		laz_die("setitimer");
	sigemptyset(&set);
	sigaddset(&set, SIGUSR2);
	sigprocmask(SIG_UNBLOCK, &set, NULL);

	if (use_tiles)
		tiles_load();
	if (has_k)
		spin_avx512();
	else if (vec_width == 32)
		spin_avx();
	else
		spin_sse();
	if (use_tiles)
		tiles_store();
	/* A permission can only be added, never taken back: the check that none appeared can be made to fail. */
	if (amx_cpu && !want_perm && laz_corrupt("xcomp_perm"))
		syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);

	__asm__ volatile("ldmxcsr %0\n\tfldcw %1" : : "m"(mxcsr_default), "m"(fcw_default));
	if (laz_corrupt("gs"))
		syscall(SYS_arch_prctl, ARCH_SET_GS, GS_TEST + 4096);
	verify();
	verify_amx();
	if (syscall(SYS_arch_prctl, ARCH_GET_GS, &gs) || gs != GS_TEST)
		laz_failf("gs base = %#lx, expected %#lx", gs, GS_TEST);
	laz_finish();
}
