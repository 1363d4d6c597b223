//! Link options for the `citytsdb` binary.

fn main() {
    // Release builds fold identical functions at link time. Without it the
    // binary carries tens of copies of the same code: `#[inline]` and generic
    // functions (the SQL syntax tree's derived `Hash`, `PartialEq` and `Drop`
    // above all) are compiled into every codegen unit that calls them, and only
    // the linker sees that the copies are the same bytes. The linker is LLD,
    // Rust's default on x86_64 Linux.
    if std::env::var("PROFILE").as_deref() == Ok("release")
        && std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,--icf=all");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
