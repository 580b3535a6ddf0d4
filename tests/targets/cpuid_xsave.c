/* Prints the XSAVE area size CPUID reports for the features the OS enabled in XCR0 (leaf 0xD, sub-leaf 0, EBX):
 * the size of the standard-format XSTATE regset the kernel hands to ptrace. An independent source for the
 * length a dump must save, whatever the CPU (2432 bytes with AVX-512, 11008 with AMX, 832 with AVX only). */
#include <cpuid.h>
#include <stdio.h>

int main(void)
{
    unsigned int a, b, c, d;
    if (!__get_cpuid_count(0xd, 0, &a, &b, &c, &d))
        return 1;
    printf("%u\n", b);
    return 0;
}
