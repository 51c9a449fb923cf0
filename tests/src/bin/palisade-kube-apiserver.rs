//! `palisade-kube-apiserver --listen 127.0.0.1:0 --kubeconfig-out PATH
//! [--load FILE.yaml]...`: the Kubernetes API server test double
//! ([`testbed::kubeapi`]) as a process, for multi-process tests and the
//! benchmark. Prints the bound address on the first line of stdout, writes
//! a kubeconfig pointing at it, and serves until killed. Other processes
//! change objects with POST/PUT/DELETE on the REST paths and drive it with
//! `POST /_test/{drop-watches,compact,pause,resume}` and `GET /_test/stats`.

use std::{io::Write, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use testbed::kubeapi::ApiServer;

#[derive(Debug, Parser)]
#[command(about = "A Kubernetes list/watch API server test double (plain HTTP, no auth)")]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Where to write a kubeconfig pointing at the server.
    #[arg(long)]
    kubeconfig_out: PathBuf,
    /// YAML files of objects to serve from the start (multi-document, or
    /// `kind: List`); may be repeated.
    #[arg(long = "load", value_name = "FILE.yaml")]
    load: Vec<PathBuf>,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 5.0)]
    bookmark_interval: f64,
    /// Changes kept per resource for watches to resume from.
    #[arg(long, default_value_t = 10_000)]
    history_limit: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match serve(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palisade-kube-apiserver: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &Args) -> Result<(), String> {
    let server =
        ApiServer::start(&args.listen).map_err(|e| format!("listen on {}: {e}", args.listen))?;
    let interval = Duration::try_from_secs_f64(args.bookmark_interval)
        .map_err(|e| format!("--bookmark-interval {}: {e}", args.bookmark_interval))?;
    server.set_bookmark_interval(interval);
    server.set_history_limit(args.history_limit);
    for file in &args.load {
        let text =
            std::fs::read_to_string(file).map_err(|e| format!("read {}: {e}", file.display()))?;
        server
            .load_yaml(&text)
            .map_err(|e| format!("load {}: {e}", file.display()))?;
    }
    server.write_kubeconfig(&args.kubeconfig_out).map_err(|e| {
        format!(
            "write the kubeconfig {}: {e}",
            args.kubeconfig_out.display()
        )
    })?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", server.addr())
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("print the address: {e}"))?;
    loop {
        std::thread::park();
    }
}
