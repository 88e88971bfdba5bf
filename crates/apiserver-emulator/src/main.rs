//! `apiserver-emulator --listen 127.0.0.1:0 --kubeconfig-out PATH`: serve until SIGTERM.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use apiserver_emulator::{Authorizer, Clock, Config, Emulator, Options, ServeOptions, User};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "apiserver-emulator", version, about = "A Kubernetes API server emulator for tests")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "EMULATOR_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write a kubeconfig for the emulator here.
    #[arg(long, env = "EMULATOR_KUBECONFIG_OUT")]
    kubeconfig_out: Option<PathBuf>,
    /// Turn on authentication and RBAC. Tokens are given with --token.
    #[arg(long, env = "EMULATOR_RBAC")]
    rbac: bool,
    /// A bearer token: `TOKEN=admin` (system:masters) or `TOKEN=sa:NAMESPACE:NAME` (a service account). Repeatable.
    #[arg(long = "token", env = "EMULATOR_TOKENS", value_delimiter = ',')]
    tokens: Vec<String>,
    /// Which token the written kubeconfig uses.
    #[arg(long, env = "EMULATOR_KUBECONFIG_TOKEN")]
    kubeconfig_token: Option<String>,
    /// Deterministic UIDs.
    #[arg(long, env = "EMULATOR_DETERMINISTIC_UIDS")]
    deterministic_uids: bool,
    /// Changes kept for watches before they get 410 Expired.
    #[arg(long, env = "EMULATOR_HISTORY", default_value_t = 10_000)]
    history: usize,
    /// Seconds between BOOKMARK events on idle watches.
    #[arg(long, env = "EMULATOR_BOOKMARK_SECONDS", default_value_t = 60)]
    bookmark_seconds: u64,
    /// Start a manual clock at this RFC 3339 time (moved with POST /emulator/clock).
    #[arg(long, env = "EMULATOR_MANUAL_CLOCK")]
    manual_clock: Option<String>,
    /// Lenient mode: no pruning, defaults or validation, and RV bumps on no-op writes.
    #[arg(long, env = "EMULATOR_LENIENT")]
    lenient: bool,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let clock = match &args.manual_clock {
        Some(t) => Clock::manual(apiserver_emulator::clock::parse_rfc3339(t).ok_or_else(|| format!("invalid --manual-clock {t:?}"))?),
        None => Clock::system(),
    };
    let authorizer = if args.rbac {
        let mut tokens = HashMap::new();
        for t in &args.tokens {
            let (token, who) =
                t.split_once('=').ok_or_else(|| format!("invalid --token {t:?}: expected TOKEN=admin or TOKEN=sa:NS:NAME"))?;
            let user = match who.split(':').collect::<Vec<_>>().as_slice() {
                ["admin"] => User::admin("admin"),
                ["sa", ns, name] => User::service_account(ns, name),
                _ => return Err(format!("invalid --token {t:?}")),
            };
            tokens.insert(token.to_owned(), user);
        }
        Authorizer::Rbac { tokens }
    } else {
        Authorizer::AllowAll
    };
    let config = Config {
        api: Options {
            history: args.history,
            deterministic_uids: args.deterministic_uids,
            strict_schema: !args.lenient,
            bump_on_noop: args.lenient,
        },
        serve: ServeOptions { bookmark_interval: Duration::from_secs(args.bookmark_seconds.max(1)), ..ServeOptions::default() },
        clock,
        authorizer,
    };
    let emulator = Emulator::start(args.listen, config).await.map_err(|e| format!("failed to listen on {}: {e}", args.listen))?;
    if let Some(path) = &args.kubeconfig_out {
        emulator
            .write_kubeconfig(path, args.kubeconfig_token.as_deref())
            .map_err(|e| format!("failed to write {}: {e}", path.display()))?;
    }
    println!("{}", emulator.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    emulator.stop().await;
    Ok(())
}
