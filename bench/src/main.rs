#![forbid(unsafe_code)]
//! `citadel-bench`: citadel's load generator and micro-benchmarks, outside the product binary.
//! Benchmarks live here, not in timed tests.
//!
//! - `load`: CreateCertificate over TLS gRPC, closed or open loop, and the lifecycle soak;
//! - `storm`: the renewal storm (`--identities N`);
//! - `micro`: the issue path in process, per stage;
//! - `scale`: revocation state and the issuance index at mesh size, in process;
//! - `args`: the flags (main.rs only dispatches, so no driver imports the crate root);
//! - `measure`: what they all measure with (percentiles, /proc CPU time and RSS, workloads,
//!   the `citadel serve` child).

use clap::Parser;

mod args;
mod load;
mod measure;
mod micro;
mod scale;
mod storm;

use args::Args;
use citadel::pki::KeyType;
use measure::BenchResult;

/// Picks the driver the flags ask for.
async fn run(args: Args) -> BenchResult {
    let key_type: KeyType = args.key_type.parse()?;
    if args.micro {
        return micro::run(args.distinct.max(1), args.requests.max(1), key_type);
    }
    if args.revocation_scale {
        return scale::revocation_scale(args.revoked, args.denied, args.requests.clamp(1, 20_000));
    }
    if let (Some(n), Some(dir)) = (args.index_entries, &args.state_dir) {
        return scale::index_scale(n, dir).await;
    }
    if let Some(n) = args.identities {
        return storm::run(
            storm::StormPlan {
                identities: n,
                concurrency: args.concurrency,
                connections: args.connections,
                key_type,
                auth: args.auth,
                kubeconfig: args.kubeconfig.clone(),
                kube_qps: args.kube_qps,
                kube_burst: args.kube_burst,
            },
            &args.citadel()?,
        )
        .await;
    }
    load::run(&args, key_type).await
}

/// The product's allocator (see bench/Cargo.toml): in-process figures must match the server.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    citadel::install_crypto_provider();
    // --index-entries runs `citadel revoke` in process, which logs as the command would.
    citadel::cmd::init_logging(citadel::cmd::LogFormat::Text);
    let result = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(run(args)),
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
