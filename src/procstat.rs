//! Memory figures of this process, read from `/proc/self/status` (Linux); reported by the
//! benchmarks and `analyze-query`, and zero where the file does not exist.

/// A `/proc/self/status` field given in kB, in bytes.
fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Has jemalloc (the binaries' allocator) return freed pages to the system from a background
/// thread. Without it, memory freed after a peak (loading the replica into the view engine)
/// stays resident until later allocations happen to purge it.
pub fn start_allocator_purging() {
    let _ = tikv_jemalloc_ctl::background_thread::write(true);
}

/// Bytes in live allocations and bytes the allocator keeps resident, from jemalloc's
/// statistics (zero in a program that runs on another allocator): the split between what the
/// program holds and what fragmentation and retained pages add to its RSS.
pub fn heap_bytes() -> (u64, u64) {
    let _ = tikv_jemalloc_ctl::epoch::advance();
    let read = |r: Result<usize, _>| r.map_or(0, |b| b as u64);
    (
        read(tikv_jemalloc_ctl::stats::allocated::read()),
        read(tikv_jemalloc_ctl::stats::resident::read()),
    )
}

/// Resident memory now.
pub fn rss_bytes() -> u64 {
    status_bytes("VmRSS:")
}

/// The largest resident memory so far.
pub fn peak_rss_bytes() -> u64 {
    status_bytes("VmHWM:")
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_is_at_least_current() {
        let now = super::rss_bytes();
        assert!(now > 0, "this runs on Linux");
        assert!(super::peak_rss_bytes() >= now);
    }
}
