//! Where in an allocator function its entry probe goes.
//!
//! A uprobe puts a breakpoint on one instruction. After the trap the kernel either
//! emulates that instruction or copies it out of line and single-steps it, a second
//! trap: measured here, `free`'s probe cost about 9 µs per call at its first
//! instruction (`test rdi, rdi`, not emulated) against under 1 µs at malloc's. x86
//! kernels emulate `push reg`, and glibc's `free` starts with `test rdi, rdi; je` (the
//! return for `free(NULL)`) followed by a push. The probe goes on the first emulated
//! instruction that every call with a non-NULL pointer reaches with the pointer
//! argument and the stack pointer unchanged, found by decoding the code; anything
//! else, or any doubt, keeps the function's first instruction.

use iced_x86::{Code, Decoder, DecoderOptions, OpKind, Register};

/// How far to look: the prologue that matters is a few instructions long.
const MAX_INSTRUCTIONS: usize = 6;

/// The offset from the start of `free`-like code (pointer in `rdi`, NULL a no-op) at
/// which to probe it. `code` starts at the function's first byte.
pub fn pointer_release_offset(code: &[u8]) -> u64 {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    // Only `free(NULL)` may skip the probe: a `je`/`jz` right after `test rdi, rdi`.
    let mut tested_null = false;
    for _ in 0..MAX_INSTRUCTIONS {
        if !decoder.can_decode() {
            break;
        }
        let insn = decoder.decode();
        if insn.is_invalid() {
            break;
        }
        match insn.code() {
            Code::Push_r64 if insn.ip() > 0 => return insn.ip(),
            // Marks an indirect-branch target and changes nothing.
            Code::Endbr64 => {}
            Code::Test_rm64_r64
                if insn.op0_kind() == OpKind::Register
                    && insn.op0_register() == Register::RDI
                    && insn.op1_register() == Register::RDI =>
            {
                tested_null = true;
            }
            Code::Je_rel8_64 | Code::Je_rel32_64 if tested_null => {
                // Taken only for a NULL pointer; the fall-through path goes on.
                tested_null = false;
            }
            _ => break,
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_the_null_test_to_the_first_push() {
        // test rdi,rdi; je +0xbf; push rbp; lea rsi,[rdi-0x10]: glibc 2.36's free.
        let free = [0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0, 0x55, 0x48, 0x8d, 0x77, 0xf0];
        assert_eq!(pointer_release_offset(&free), 9);
        // The same behind an endbr64.
        let cet = [&[0xf3, 0x0f, 0x1e, 0xfa][..], &free].concat();
        assert_eq!(pointer_release_offset(&cet), 13);
        // A short je.
        assert_eq!(pointer_release_offset(&[0x48, 0x85, 0xff, 0x74, 0x10, 0x53]), 5);
    }

    #[test]
    fn any_doubt_keeps_the_first_instruction() {
        // A push first: emulated already.
        assert_eq!(pointer_release_offset(&[0x55, 0x48, 0x89, 0xe5]), 0);
        // The pointer is tested but the branch is jne: the pointer path would skip the probe.
        assert_eq!(pointer_release_offset(&[0x48, 0x85, 0xff, 0x75, 0x10, 0x53]), 0);
        // Another register is tested.
        assert_eq!(pointer_release_offset(&[0x48, 0x85, 0xf6, 0x74, 0x10, 0x53]), 0);
        // rdi is written before the push.
        assert_eq!(pointer_release_offset(&[0x48, 0x85, 0xff, 0x74, 0x10, 0x48, 0x89, 0xc7, 0x53]), 0);
        // A je with no test before it.
        assert_eq!(pointer_release_offset(&[0x74, 0x10, 0x53]), 0);
        // Truncated or empty code.
        assert_eq!(pointer_release_offset(&[0x48, 0x85]), 0);
        assert_eq!(pointer_release_offset(&[]), 0);
    }
}
