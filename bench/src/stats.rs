//! Percentiles, and pgbench's per-transaction logs turned into the same figures.

use std::path::PathBuf;

/// The `p`-th percentile (0–100) of sorted values, by nearest rank; 0 for no values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50 / p99 / max of unsorted values (sorted in place).
pub fn summary(values: &mut [u64]) -> (u64, u64, u64) {
    values.sort_unstable();
    (
        percentile(values, 50.0),
        percentile(values, 99.0),
        values.last().copied().unwrap_or(0),
    )
}

/// Prints `{"count", "p50_us", "p99_us"}` for the latencies (3rd column, µs) of pgbench `--log`
/// files: `client_id transaction_no time_us script_no time_epoch time_us_part …`.
pub fn pglog(files: &[PathBuf]) -> Result<(), String> {
    let mut lat = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        for line in text.lines() {
            if let Some(v) = line
                .split_ascii_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<u64>().ok())
            {
                lat.push(v);
            }
        }
    }
    let (p50, p99, _) = summary(&mut lat);
    println!(
        "{}",
        serde_json::json!({ "count": lat.len(), "p50_us": p50, "p99_us": p99 })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
