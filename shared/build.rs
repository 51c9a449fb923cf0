//! Compiles the C programs in `bpf/` with clang into `OUT_DIR`; the library
//! embeds the objects. No object file is checked in. Also generates Rust
//! declarations from `bpf/include/palisade_abi.h` (bindgen), against which
//! `src/abi.rs` checks every struct and constant at compile time.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const PROGRAMS: &[&str] = &["from_container", "to_container", "service", "l7_steer"];

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let bpf = manifest.join("../bpf");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let clang = env::var("PALISADE_CLANG").unwrap_or_else(|_| "clang".to_owned());

    for dir in ["include", "lib"] {
        rerun_for_dir(&bpf.join(dir));
    }
    println!("cargo:rerun-if-env-changed=PALISADE_CLANG");

    abi_bindings(&bpf, &out);

    for prog in PROGRAMS {
        let src = bpf.join(format!("{prog}.c"));
        println!("cargo:rerun-if-changed={}", src.display());
        let obj = out.join(format!("{prog}.o"));
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
            // Debian keeps asm/types.h under the multiarch directory.
            .arg(format!("-I/usr/include/{}-linux-gnu", multiarch()))
            .arg("-I")
            .arg(bpf.join("include"))
            .arg("-I")
            .arg(&bpf)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("clang failed to compile {} ({s})", src.display()),
            Err(e) => panic!(
                "cannot run `{clang}` to compile the eBPF programs ({e}); \
                 install clang, llvm and libbpf-dev (Debian: apt-get install clang llvm libbpf-dev), \
                 or set PALISADE_CLANG to a clang binary"
            ),
        }
    }
}

fn multiarch() -> &'static str {
    match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64",
        _ => "x86_64",
    }
}

fn rerun_for_dir(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// `abi_c.rs`: the ABI header's structs and `PAL_*` constants as bindgen
/// reads them (through libclang, as the BPF compiler does).
fn abi_bindings(bpf: &Path, out: &Path) {
    let header = bpf.join("include/palisade_abi.h");
    let bindings = bindgen::Builder::default()
        .header(header.display().to_string())
        .clang_arg(format!("-I/usr/include/{}-linux-gnu", multiarch()))
        .allowlist_type("pal_.*")
        .allowlist_var("PAL_.*")
        .derive_default(true)
        .layout_tests(false)
        .generate()
        .unwrap_or_else(|e| {
            panic!(
                "bindgen could not read {} ({e}); it needs libclang \
                 (Debian: apt-get install libclang-dev)",
                header.display()
            )
        });
    bindings
        .write_to_file(out.join("abi_c.rs"))
        .expect("write abi_c.rs");
}
