"""The init of a PID namespace made by `restore --pidns`: a few instructions, no libc, no Python.

It runs on the first page of the restore trampoline (kernel/clone.py) in a task whose address space is
otherwise empty, with every signal blocked, so its whole footprint is that page. Entry: rdi = the root's pid
inside the namespace, rsi = DATA (a sigset at +0, a wait status at +8).

    loop:  sig = rt_sigtimedwait({HUP, INT, TERM, CHLD})      blocked signals queue even for a pid 1 whose
           CHLD:  while (p = wait4(-1, &st, WNOHANG|__WALL)) > 0:       handlers are SIG_DFL
                      p == root -> exit_group(WIFSIGNALED ? 128 + sig : exit code)
           other: kill(root, sig)                           forwarded; anything else stays pending, unused

Once it exits the kernel kills whatever is left in the namespace (the root's orphaned descendants, which it
reaped meanwhile), so the namespace lives exactly as long as the restored root.
"""

from __future__ import annotations

import signal

# x86_64, assembled from the loop above (GNU as, Intel syntax); each line one instruction.
CODE = bytes.fromhex("".join([
    "4989fc",            # mov r12, rdi              root pid in the namespace
    "4989f5",            # mov r13, rsi              DATA
    # wait_sig (+0x06):
    "4c89ef",            # mov rdi, r13              the sigset
    "31f6",              # xor esi, esi              no siginfo
    "31d2",              # xor edx, edx              no timeout
    "41ba08000000",      # mov r10d, 8               sigsetsize
    "b880000000",        # mov eax, 128 (rt_sigtimedwait)
    "0f05",              # syscall
    "83f811",            # cmp eax, 17 (SIGCHLD)
    "7412",              # je reap
    "85c0",              # test eax, eax
    "7ee3",              # jle wait_sig              -EINTR and the like
    "89c6",              # mov esi, eax
    "4489e7",            # mov edi, r12d
    "b83e000000",        # mov eax, 62 (kill)        forward it to the root
    "0f05",              # syscall
    "ebd5",              # jmp wait_sig
    # reap (+0x31):
    "bfffffffff",        # mov edi, -1
    "498d7508",          # lea rsi, [r13+8]
    "ba01000040",        # mov edx, WNOHANG | __WALL
    "4531d2",            # xor r10d, r10d
    "b83d000000",        # mov eax, 61 (wait4)
    "0f05",              # syscall
    "85c0",              # test eax, eax
    "7eb9",              # jle wait_sig              nothing more now, or no children
    "4439e0",            # cmp eax, r12d
    "75df",              # jne reap                  an orphan: reaped; look for more
    "418b4508",          # mov eax, [r13+8]          the root's wait status
    "89c7",              # mov edi, eax
    "83e77f",            # and edi, 0x7f             WTERMSIG
    "7408",              # jz exited
    "81c780000000",      # add edi, 128
    "eb06",              # jmp out
    # exited (+0x65):
    "c1e808",            # shr eax, 8
    "0fb6f8",            # movzx edi, al             WEXITSTATUS
    # out (+0x6b):
    "b8e7000000",        # mov eax, 231 (exit_group)
    "0f05",              # syscall
    "ebf7",              # jmp out
]))
CODE_OFFSET = 0x100  # on the trampoline page, after its clone3 code and syscall instruction
DATA_OFFSET = 0x800
SIGSET = sum(1 << (s - 1) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD))
FORWARDED = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)
