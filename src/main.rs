use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    dbshift::cli::main().await
}
