//! `leasehold-server`: see `leasehold-server --help`.

#[global_allocator]
static ALLOCATOR: leasehold_server::Allocator = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    leasehold_server::cli::main()
}
