//! Link settings of the server binary.

fn main() {
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let gnu = std::env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|env| env == "gnu");
    if linux && gnu {
        // Relative relocations packed (DT_RELR: glibc 2.36, binutils 2.38): the dynamic
        // loader reads the whole relocation table at every start and its pages stay
        // resident; packed, the table is a small fraction of its 1.3 MB.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
