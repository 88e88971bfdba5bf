//! The command line: `statelock crds`, `statelock run`, `statelock apply-lock-source` and `statelock sandbox`. Every flag can also be set through a
//! `STATELOCK_*` environment variable, which is how the Helm chart configures the operator.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Terraform/OpenTofu state locks as Kubernetes objects.
#[derive(Debug, Parser)]
#[command(name = "statelock", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions (or write one file per CRD with --write-dir).
    Crds(CrdsArgs),
    /// Run the operator against the cluster of the current kubeconfig (or in-cluster config).
    Run(RunArgs),
    /// Create a LockSource, or set an existing one's spec to the one given, keeping its identity
    /// (the Helm chart's post-install/post-upgrade hook for `defaultLockSource`).
    ApplyLockSource(ApplyLockSourceArgs),
    /// Start everything on this machine: a Kubernetes API emulator with the CRDs, the operator,
    /// the gateway on in-memory lock tables and an in-memory S3; prints what to run next.
    #[cfg(feature = "sandbox")]
    Sandbox(SandboxArgs),
}

#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Where to write the kubeconfig, the environment file and the backend block.
    #[arg(long, env = "STATELOCK_SANDBOX_DIR", default_value = "statelock-sandbox")]
    pub dir: PathBuf,

    /// Play a short story with real Terraform processes (contention, a runner killed, its lock
    /// released), then stop; exit 0 only if it played as it should.
    #[arg(long, env = "STATELOCK_SANDBOX_DEMO")]
    pub demo: bool,

    /// The Terraform binary (for the demo, and to print a backend block that fits it).
    #[arg(long, env = "STATELOCK_TERRAFORM", default_value = "terraform")]
    pub terraform: PathBuf,
}

#[derive(Debug, Args)]
pub struct ApplyLockSourceArgs {
    /// The LockSource manifest, as YAML or JSON; its namespace defaults to the client's.
    #[arg(long, env = "STATELOCK_LOCK_SOURCE")]
    pub manifest: String,

    /// How long to keep trying while the LockSource API is not served yet (a fresh install's
    /// CRD is being established) or the API server answers with errors.
    #[arg(long, env = "STATELOCK_APPLY_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Logging options.
#[derive(Debug, Args)]
pub struct TelemetryArgs {
    /// Log line format.
    #[arg(long, env = "STATELOCK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,

    /// Log filter in `tracing` env-filter syntax, e.g. `info,statelock=debug`.
    #[arg(long, env = "STATELOCK_LOG", default_value = "info", global = true)]
    pub log_filter: String,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Where the gateway sends calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GatewayBackend {
    /// Forward to the LockSource's DynamoDB table with the operator's credentials.
    Dynamodb,
    /// In-memory tables with DynamoDB's conditional semantics (sandbox and tests).
    Memory,
}

#[derive(Debug, Args)]
pub struct CrdsArgs {
    /// Write each CRD to `<dir>/<plural>.<group>.yaml` instead of printing them all.
    #[arg(long, env = "STATELOCK_CRDS_WRITE_DIR")]
    pub write_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address of the admin server (`/livez`, `/readyz`, `/metrics`).
    #[arg(long, env = "STATELOCK_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,

    /// Serve the DynamoDB-compatible lock gateway on this address (off when unset).
    #[arg(long, env = "STATELOCK_GATEWAY_ADDR")]
    pub gateway_addr: Option<SocketAddr>,

    /// Where the gateway sends calls: the LockSource's DynamoDB table, or in-memory tables.
    #[arg(long, env = "STATELOCK_GATEWAY_BACKEND", value_enum, default_value_t = GatewayBackend::Dynamodb)]
    pub gateway_backend: GatewayBackend,

    /// A waiter that has not retried for this long is taken to have given up (Terraform retries
    /// at most 16 s apart).
    #[arg(long, env = "STATELOCK_GATEWAY_WAITER_TIMEOUT", default_value = "40s", value_parser = parse_duration)]
    pub gateway_waiter_timeout: Duration,

    /// This replica's name, used as the events' reporting instance (the chart sets the pod name).
    #[arg(long, env = "STATELOCK_POD_NAME", default_value = "statelock")]
    pub pod_name: String,

    /// How long to wait for in-flight work after SIGTERM before exiting anyway.
    #[arg(long, env = "STATELOCK_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Elect a leader among replicas on a Lease: only the leader mirrors, expires and writes
    /// status (`--leader-election=false` makes this process act alone).
    #[arg(long, env = "STATELOCK_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the leader-election Lease.
    #[arg(long, env = "STATELOCK_LEASE_NAME", default_value = "statelock")]
    pub lease_name: String,

    /// Namespace of the Lease (default: the kubeconfig's namespace, in a pod its own).
    #[arg(long, env = "STATELOCK_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long a leader that stopped renewing keeps the Lease before another replica takes
    /// over; the leader itself stops writing after two thirds of it.
    #[arg(long, env = "STATELOCK_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// Namespaces whose LockSources may use the operator's own AWS identity (its default
    /// credential chain: environment, IRSA, instance profile), comma-separated; `*` for every
    /// namespace. Unset means only the operator's own namespace. LockSources elsewhere must name a
    /// credentials Secret of their own.
    #[arg(long, env = "STATELOCK_AWS_IDENTITY_NAMESPACES", value_delimiter = ',')]
    pub aws_identity_namespaces: Vec<String>,

    /// Endpoints LockSources may name in `spec.dynamodb.endpoint` and `spec.s3.endpoint`, comma-separated, each
    /// `scheme://host[:port]` (port `*` for any). Unset means none: only AWS's regional endpoints.
    /// The operator never sends a request to an endpoint outside this list.
    #[arg(long, env = "STATELOCK_ALLOWED_ENDPOINTS", value_delimiter = ',')]
    pub allowed_endpoints: Vec<String>,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<crate::crd::GoDuration>().map(|d| d.get()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_a_statelock_environment_variable() {
        fn check(cmd: &clap::Command) {
            for arg in cmd.get_arguments() {
                if arg.is_positional() || matches!(arg.get_id().as_str(), "help" | "version") {
                    continue;
                }
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                assert!(
                    env.as_deref().is_some_and(|e| e.starts_with("STATELOCK_")),
                    "flag --{} of `{}` has no STATELOCK_* env var",
                    arg.get_id(),
                    cmd.get_name()
                );
            }
            for sub in cmd.get_subcommands() {
                check(sub);
            }
        }
        check(&Cli::command());
    }

    #[test]
    fn run_flags_parse_from_the_command_line() {
        let cli =
            Cli::try_parse_from(["statelock", "--log-format", "json", "run", "--admin-addr", "127.0.0.1:9", "--shutdown-timeout", "1m"])
                .expect("parse");
        assert_eq!(cli.telemetry.log_format, LogFormat::Json);
        let Command::Run(run) = cli.command else { panic!("expected run") };
        assert_eq!(run.admin_addr, "127.0.0.1:9".parse().expect("addr"));
        assert_eq!(run.shutdown_timeout, Duration::from_secs(60));
    }
}
