//! `leasehold-server`: see `leasehold-server --help`.

fn main() -> std::process::ExitCode {
    leasehold_server::cli::main()
}
