/*
 * vmflags.h - read the VmFlags line of /proc/self/smaps for an address, and compare it as a set of codes
 * (the order the kernel prints them in is its own). Used by the mapping-state targets.
 */
#ifndef LAZ_VMFLAGS_H
#define LAZ_VMFLAGS_H

#include "common.h"

/* Copy the VmFlags codes ("rd wr mr ...") of the vma holding ADDR into buf; returns 0, or -1 if unmapped. */
LAZ_FN int laz_vmflags(const void *addr, char *buf, size_t len)
{
	FILE *f = fopen("/proc/self/smaps", "re");
	char line[PATH_MAX + 128];
	uintptr_t a = (uintptr_t)addr;
	int in = 0, found = -1;

	if (!f)
		laz_die("open /proc/self/smaps");
	buf[0] = '\0';
	while (fgets(line, sizeof(line), f)) {
		unsigned long start, end;
		char dash;

		if (sscanf(line, "%lx%c%lx ", &start, &dash, &end) == 3 && dash == '-') {
			in = a >= start && a < end;
			continue;
		}
		if (in && strncmp(line, "VmFlags:", 8) == 0) {
			size_t n = laz_line_value(buf, len, line + 8);

			while (n && buf[n - 1] == ' ') /* the kernel ends the list with a space */
				buf[--n] = '\0';
			found = 0;
			break;
		}
	}
	fclose(f);
	return found;
}

/*
 * Whether the space-separated code lists A and B hold the same codes (two letters each). "um" is left
 * out: a lazily restored process shows it (Lazarus's own userfaultfd registration) until all its pages
 * are in.
 */
LAZ_FN int laz_same_codes(const char *a, const char *b)
{
	const char *lists[2][2] = { { a, b }, { b, a } };
	int k;

	for (k = 0; k < 2; k++) {
		const char *p = lists[k][0];

		while (*p) {
			char code[3] = { p[0], p[1], 0 };
			const char *q = lists[k][1];
			int hit = 0;

			if (!p[1])
				return 0;
			if (code[0] == 'u' && code[1] == 'm') {
				p += p[2] ? 3 : 2;
				continue;
			}
			for (; *q; q += (q[2] ? 3 : 2))
				if (q[0] == code[0] && q[1] == code[1])
					hit = 1;
			if (!hit)
				return 0;
			p += p[2] ? 3 : 2;
		}
	}
	return 1;
}

/* Fail the check WHAT unless the vma at ADDR shows exactly the codes WANT. */
LAZ_FN void laz_expect_vmflags(const char *what, const void *addr, const char *want)
{
	char got[256];

	if (laz_vmflags(addr, got, sizeof(got))) {
		laz_failf("%s: %p is not mapped", what, addr);
		return;
	}
	if (!laz_same_codes(got, want))
		laz_failf("%s: VmFlags \"%s\", expected \"%s\"", what, got, want);
}

#endif /* LAZ_VMFLAGS_H */
