//! The `zero-cache` server binary.

use zero_cache::config::Config;

// jemalloc returns freed pages to the system and fragments less than glibc's malloc under the
// engine's many small, long-lived allocations (rows, index keys), which is most of the RSS.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    zero_cache::procstat::start_allocator_purging();
    let config = Config::from_env_and_args();
    let telemetry = match zero_cache::server::init_logging(&config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("zero-cache: {e}");
            std::process::exit(2);
        }
    };
    let open_files = zero_cache::server::raise_open_files_limit();
    tracing::debug!(limit = ?open_files, "open files limit");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let result = zero_cache::server::run(config, shutdown).await;
    if let Some(t) = telemetry {
        // The exporter's thread blocks on HTTP: flush from a blocking thread.
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    if let Err(e) = result {
        tracing::error!(error = %e, "zero-cache stopped");
        eprintln!("zero-cache: {e}");
        std::process::exit(1);
    }
    Ok(())
}
