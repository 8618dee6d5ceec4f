//! Garbage collection of client view records (`ZERO_CVR_GARBAGE_COLLECTION_*`): a record whose
//! group has not been connected for the inactivity threshold is deleted, so the store does not
//! grow with every browser that ever connected. A client of a deleted group that comes back
//! with its cookie gets `ClientNotFound` and starts afresh, as with zero-cache.
//!
//! Each pass first marks the records of the groups running in this process active (another
//! process sharing a Postgres store then never collects them), then deletes up to the batch
//! size of the oldest inactive records that no view-syncer here runs. Passes that delete
//! nothing double the interval, up to [`MAX_INTERVAL`].

use std::sync::Weak;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::SyncShared;

/// The longest wait between passes.
pub const MAX_INTERVAL: Duration = Duration::from_secs(16 * 60);

/// Settings of the collector.
#[derive(Debug, Clone)]
pub struct CvrGcOptions {
    /// A record is collectable once its group has been inactive this long.
    pub inactivity: Duration,
    /// Wait before the first pass and after a pass that deleted something.
    pub interval: Duration,
    /// Records deleted per pass at most; 0 deletes none (running groups are still marked).
    pub batch: usize,
}

impl Default for CvrGcOptions {
    fn default() -> CvrGcOptions {
        CvrGcOptions {
            inactivity: Duration::from_secs(48 * 3600),
            interval: Duration::from_secs(60),
            batch: 25,
        }
    }
}

/// Runs passes until the server is gone.
pub(crate) async fn run(shared: Weak<SyncShared>, opts: CvrGcOptions) {
    let initial = opts.interval.max(Duration::from_millis(10));
    let mut interval = initial;
    loop {
        tokio::time::sleep(interval).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if *shared.closing.borrow() {
            return;
        }
        if let Err(e) = shared.cvr.touch(shared.live_groups()).await {
            warn!(error = %e, "running groups' client view records could not be marked active");
        }
        if opts.batch == 0 {
            interval = (interval * 2).min(MAX_INTERVAL);
            continue;
        }
        let before_ms = crate::replica::now_ms() - opts.inactivity.as_millis() as i64;
        let live = |g: &str| shared.is_live(g);
        match shared
            .cvr
            .collect_garbage(before_ms, opts.batch, &live)
            .await
        {
            Ok(0) => {
                debug!("no inactive client view records");
                interval = (interval * 2).min(MAX_INTERVAL);
            }
            Ok(n) => {
                info!(
                    groups = n,
                    inactive_hours = opts.inactivity.as_secs_f64() / 3600.0,
                    "inactive client view records deleted"
                );
                interval = initial;
            }
            Err(e) => {
                warn!(error = %e, "client view record garbage collection failed");
                interval = (interval * 2).min(MAX_INTERVAL);
            }
        }
    }
}
