#![forbid(unsafe_code)]
//! The `citadel` command line. Flags live here and in `cmd/`; behaviour lives in the library.

use clap::{Parser, Subcommand};

use citadel::cmd::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "citadel",
    version,
    about = "A mesh certificate authority, wire-compatible with Istio's CA protocol",
    long_about = "citadel issues SPIFFE X.509 workload certificates (spiffe://<td>/ns/<ns>/sa/<sa>) \
to sidecar agents that present a Kubernetes service-account token and a CSR over Istio's \
CreateCertificate gRPC API.\n\nQuick start:\n  citadel serve --dev &\n  citadel dev-token -n shop --service-account cart > token.jwt\n  citadel request --ca-addr 127.0.0.1:15012 --ca-root-cert citadel-data/root-cert.pem --token-file token.jwt --out-dir certs/"
)]
struct Cli {
    /// Log format (logs go to stderr; RUST_LOG sets the level, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the CA: CreateCertificate over TLS gRPC, plus /metrics and /healthz.
    Serve(Box<cmd::serve::Args>),
    /// Mint a service-account token with the DEV key (accepted by `serve --dev` only).
    DevToken(cmd::dev_token::Args),
    /// Request a workload certificate from a running CA and write it to files.
    Request(cmd::request::Args),
    /// Sidecar agent: fetch and renew a workload certificate; serve Envoy over SDS and/or files.
    Agent(Box<cmd::agent::Args>),
    /// Inspect and operate the CA (state directory or Kubernetes store): status, bundle, crl, rotate-root.
    #[command(subcommand)]
    Ca(cmd::ca::Command),
    /// Revoke a certificate by serial, or deny an identity and revoke its certificates.
    Revoke(cmd::revoke::Args),
    // No benchmark here: the load tools are their own binary, `citadel-bench` (bench/).
}

/// mimalloc instead of glibc malloc: the issue path allocates a few dozen small buffers per
/// certificate across two runtime threads; see docs/benchmarks.md (issue #12) for the counts.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    citadel::install_crypto_provider();
    cmd::init_logging(cli.log_format);
    let result = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(async move {
            match cli.command {
                Command::Serve(a) => cmd::serve::run(*a).await,
                Command::DevToken(a) => cmd::dev_token::run(a),
                Command::Request(a) => cmd::request::run(a).await,
                Command::Agent(a) => cmd::agent::run(*a).await,
                Command::Ca(c) => cmd::ca::run(c).await,
                Command::Revoke(a) => cmd::revoke::run(a).await,
            }
        }),
        Err(e) => Err(format!("cannot start the async runtime: {e}")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
