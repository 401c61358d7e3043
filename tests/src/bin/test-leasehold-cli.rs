//! The `leasehold` CLI, built inside this crate so that its tests can spawn it as a process
//! (`CARGO_BIN_EXE_test-leasehold-cli`). It is `leasehold`, nothing added.

fn main() -> std::process::ExitCode {
    leasehold::cli::main()
}
