//! llm-gateway's executable: the server and the management CLI, both in the library
//! (`src/lib.rs`); this only hands the command line over.

fn main() -> std::process::ExitCode {
    llm_gateway::cli::main()
}
