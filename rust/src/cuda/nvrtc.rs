//! NVRTC: compiles the embedded kernel sources (cuda/*.cu) to a CUBIN for one GPU arch at first
//! use, and keeps the result on disk keyed by source hash, arch and NVRTC version.
//!
//! libnvrtc is opened at run time by cudarc under its usual names (libnvrtc.so.13, ...); the
//! Python layer preloads it from the torch wheel's nvidia folder or CUDA_HOME when the dynamic
//! loader would not find it by name. Absent, every entry point returns `LoraError::Cuda`.

use std::ffi::{c_char, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result as nvrtc, sys};

use crate::error::{LoraError, Result};

/// Prepended to every family: argument structs, 16-bit float conversion, token segments.
const COMMON: &str = include_str!("../../../cuda/lora_common.cuh");

/// The decode shrink of one item (cuda/lora_shrink_decode.cuh): shared by the two-kernel path and
/// the fused decode kernel, prepended to both families.
const SHRINK_DECODE: (&str, &str) = ("lora_shrink_decode.cuh", include_str!("../../../cuda/lora_shrink_decode.cuh"));

/// The pipelined kernels' ring geometry, copies, fragments and work items (cuda/lora_pipe.cuh):
/// prepended to the pipelined prefill family.
const PIPE: (&str, &str) = ("lora_pipe.cuh", include_str!("../../../cuda/lora_pipe.cuh"));

/// One .cu file: its kernels are compiled and loaded together.
pub struct KernelFamily {
    pub name: &'static str,
    /// (file name, source) of the shared parts prepended after the common header
    pub parts: &'static [(&'static str, &'static str)],
    pub body: &'static str,
    pub functions: &'static [&'static str],
}

pub const SHRINK: KernelFamily = KernelFamily {
    name: "lora_shrink",
    parts: &[SHRINK_DECODE],
    body: include_str!("../../../cuda/lora_shrink.cu"),
    functions: &[
        "lora_shrink_decode_bf16",
        "lora_shrink_decode_f16",
        "lora_shrink_tile_bf16",
        "lora_shrink_tile_f16",
        "lora_shrink_reduce",
    ],
};

pub const EXPAND: KernelFamily = KernelFamily {
    name: "lora_expand",
    parts: &[],
    body: include_str!("../../../cuda/lora_expand.cu"),
    functions: &[
        "lora_expand_decode_bf16_o1",
        "lora_expand_decode_f16_o1",
        "lora_expand_decode_bf16_o1w",
        "lora_expand_decode_f16_o1w",
        "lora_expand_decode_bf16_o4",
        "lora_expand_decode_f16_o4",
        "lora_expand_flat_bf16",
        "lora_expand_flat_f16",
        "lora_expand_tile_bf16_c1",
        "lora_expand_tile_f16_c1",
        "lora_expand_tile_bf16_c4",
        "lora_expand_tile_f16_c4",
    ],
};

pub const PREFILL: KernelFamily = KernelFamily {
    name: "lora_prefill",
    parts: &[PIPE],
    body: include_str!("../../../cuda/lora_prefill.cu"),
    functions: &[
        "lora_prefill_shrink_bf16",
        "lora_prefill_shrink_f16",
        "lora_prefill_shrink_bf16_serial",
        "lora_prefill_shrink_f16_serial",
        "lora_prefill_shrink_bf16_f4",
        "lora_prefill_shrink_f16_f4",
        "lora_prefill_shrink_bf16_w1",
        "lora_prefill_shrink_f16_w1",
        "lora_prefill_shrink_bf16_w2",
        "lora_prefill_shrink_f16_w2",
        "lora_prefill_shrink_bf16_w3",
        "lora_prefill_shrink_f16_w3",
        "lora_prefill_shrink_bf16_w4",
        "lora_prefill_shrink_f16_w4",
        "lora_prefill_shrink_bf16_lds32",
        "lora_prefill_shrink_f16_lds32",
        "lora_prefill_expand_bf16",
        "lora_prefill_expand_f16",
        "lora_prefill_expand_bf16_w1",
        "lora_prefill_expand_f16_w1",
        "lora_prefill_expand_bf16_w2",
        "lora_prefill_expand_f16_w2",
        "lora_prefill_expand_bf16_w3",
        "lora_prefill_expand_f16_w3",
        "lora_prefill_expand_bf16_w4",
        "lora_prefill_expand_f16_w4",
        "lora_prefill_expand_bf16_lds32",
        "lora_prefill_expand_f16_lds32",
    ],
};

pub const SEGMENTS: KernelFamily = KernelFamily {
    name: "lora_segments",
    parts: &[],
    body: include_str!("../../../cuda/lora_segments.cu"),
    functions: &["lora_segments"],
};

pub const FUSED: KernelFamily = KernelFamily {
    name: "lora_fused",
    parts: &[SHRINK_DECODE],
    body: include_str!("../../../cuda/lora_fused.cu"),
    functions: &[
        "lora_fused_decode_bf16",
        "lora_fused_decode_f16",
        "lora_fused_decode_bf16_m4",
        "lora_fused_decode_f16_m4",
        "lora_fused_decode_bf16_m5",
        "lora_fused_decode_f16_m5",
        "lora_fused_decode_bf16_sa3",
        "lora_fused_decode_f16_sa3",
        "lora_fused_decode_bf16_sa4",
        "lora_fused_decode_f16_sa4",
        "lora_fused_decode_bf16_sa5",
        "lora_fused_decode_f16_sa5",
    ],
};

pub const MERGE: KernelFamily = KernelFamily {
    name: "lora_merge",
    parts: &[],
    body: include_str!("../../../cuda/lora_merge.cu"),
    functions: &["lora_beside_merge_bf16", "lora_beside_merge_f16"],
};

pub const FAMILIES: [&KernelFamily; 6] = [&SEGMENTS, &SHRINK, &EXPAND, &FUSED, &PREFILL, &MERGE];

impl KernelFamily {
    pub fn source(&self) -> String {
        let mut src = String::from(COMMON);
        for (name, part) in self.parts {
            src.push_str(&format!("\n#line 1 \"{name}\"\n{part}"));
        }
        src.push_str(&format!("\n#line 1 \"{}.cu\"\n{}", self.name, self.body));
        src
    }
}

/// Whether a libnvrtc can be opened (cudarc panics on first use otherwise; we ask first).
pub fn library_present() -> bool {
    std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

fn require_library() -> Result<()> {
    if library_present() {
        Ok(())
    } else {
        Err(LoraError::Cuda(
            "libnvrtc not found: install the CUDA runtime wheels that come with torch (nvidia/cu13 or \
             nvidia-cuda-nvrtc) or a CUDA toolkit, or put its lib folder on LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

/// (major, minor) of the NVRTC in use.
pub fn version() -> Result<(i32, i32)> {
    require_library()?;
    let (mut major, mut minor) = (0, 0);
    let rc = std::panic::catch_unwind(move || unsafe {
        let rc = sys::nvrtcVersion(&mut major, &mut minor);
        (rc, major, minor)
    })
    .map_err(|_| LoraError::Cuda("libnvrtc has no nvrtcVersion".into()))?;
    rc.0.result().map_err(|e| LoraError::Cuda(format!("nvrtcVersion: {e}")))?;
    Ok((rc.1, rc.2))
}

/// Compile options; part of the cache key.
fn options(arch: u32) -> Vec<String> {
    vec![format!("--gpu-architecture=sm_{arch}"), "-std=c++17".into(), "--fmad=true".into()]
}

/// FNV-1a: a hash that stays the same across Rust versions, so the disk cache stays valid.
fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in parts {
        for b in part.iter() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Where compiled kernels are kept: LORAMUX_KERNEL_CACHE, else the user's cache folder.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LORAMUX_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("loramux").join("kernels"))
}

/// The CUBIN of `family` for `sm_{arch}`, from the disk cache or freshly compiled.
pub fn cubin(family: &KernelFamily, arch: u32) -> Result<Vec<u8>> {
    let (major, minor) = version()?;
    let source = family.source();
    let opts = options(arch).join(" ");
    let key = fnv1a64(&[source.as_bytes(), opts.as_bytes(), format!("{major}.{minor}").as_bytes()]);
    let path = cache_dir().map(|d| d.join(format!("{}-sm{arch}-nvrtc{major}.{minor}-{key:016x}.cubin", family.name)));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            if !bytes.is_empty() {
                return Ok(bytes);
            }
        }
    }
    let bytes = compile(family, &source, arch)?;
    if let Some(p) = &path {
        // Best effort: a read-only home only costs a recompile next time. Write then rename so a
        // concurrent reader never sees half a file.
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &bytes).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(bytes)
}

/// Compiles without the disk cache; a compile error carries NVRTC's log.
pub fn compile(family: &KernelFamily, source: &str, arch: u32) -> Result<Vec<u8>> {
    require_library()?;
    let src = CString::new(source).map_err(|_| LoraError::Cuda("kernel source holds a NUL byte".into()))?;
    let name = CString::new(format!("{}.cu", family.name)).expect("no NUL in family names");
    let cuda = |what: &str, e: nvrtc::NvrtcError| LoraError::Cuda(format!("NVRTC {what}: {e}"));
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| cuda("create program", e))?;
    let result = (|| unsafe {
        if let Err(e) = nvrtc::compile_program(prog, &options(arch)) {
            let log = nvrtc::get_program_log(prog).map(|l| c_chars_to_string(&l)).unwrap_or_default();
            return Err(if e.0 == sys::nvrtcResult::NVRTC_ERROR_COMPILATION {
                LoraError::Compile { kernel: format!("{} (sm_{arch})", family.name), log }
            } else {
                LoraError::Cuda(format!("NVRTC compile {}: {e}: {log}", family.name))
            });
        }
        let mut size = 0usize;
        sys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| cuda("cubin size", e))?;
        let mut bytes = vec![0u8; size];
        sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr() as *mut c_char).result().map_err(|e| cuda("get cubin", e))?;
        Ok(bytes)
    })();
    unsafe {
        let _ = nvrtc::destroy_program(prog);
    }
    result
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_changes_with_every_part() {
        let base = fnv1a64(&[b"src", b"opts", b"13.0"]);
        assert_ne!(base, fnv1a64(&[b"src2", b"opts", b"13.0"]));
        assert_ne!(base, fnv1a64(&[b"src", b"opts", b"13.2"]));
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
    }

    #[test]
    fn every_family_names_its_functions_in_its_source() {
        for family in FAMILIES {
            let src = family.source();
            for f in family.functions {
                assert!(src.contains(&format!(") {f}(")), "{f}");
            }
        }
    }
}
