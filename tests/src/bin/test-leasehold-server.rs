//! The server binary, built inside this crate so that its tests can spawn it as a process
//! (`CARGO_BIN_EXE_test-leasehold-server`). It is `leasehold-server`, nothing added.

#[global_allocator]
static ALLOCATOR: leasehold_server::Allocator = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    leasehold_server::cli::main()
}
