//! Resident memory of processes, from `/proc`.

/// Resident and proportional set sizes of one process, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

impl std::ops::Add for Memory {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            rss_kib: self.rss_kib + o.rss_kib,
            pss_kib: self.pss_kib + o.pss_kib,
        }
    }
}

/// `Rss` and `Pss` from `/proc/PID/smaps_rollup` (falls back to `VmRSS` for both).
pub fn memory(pid: u32) -> Result<Memory, String> {
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_ascii_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        if let (Some(rss), Some(pss)) = (field(&text, "Rss:"), field(&text, "Pss:")) {
            return Ok(Memory {
                rss_kib: rss,
                pss_kib: pss,
            });
        }
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read the memory of pid {pid}: {e}"))?;
    let rss = field(&text, "VmRSS:").ok_or_else(|| format!("pid {pid} has no VmRSS"))?;
    Ok(Memory {
        rss_kib: rss,
        pss_kib: rss,
    })
}

/// `RssAnon` and `RssFile` (KiB) from `/proc/PID/status`: heap and stacks vs mapped files
/// (the binary's pages, shared libraries).
pub fn rss_split(pid: u32) -> Result<(u64, u64), String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read the status of pid {pid}: {e}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_ascii_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("pid {pid} has no {name}"))
    };
    Ok((field("RssAnon:")?, field("RssFile:")?))
}

/// The sum over `pids`.
pub fn total(pids: &[u32]) -> Result<Memory, String> {
    pids.iter()
        .try_fold(Memory::default(), |acc, &p| Ok(acc + memory(p)?))
}

/// Open file descriptors of a process.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}
