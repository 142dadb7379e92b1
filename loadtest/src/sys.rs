//! The few OS-level knobs and readings the tool needs on Linux: the open-file limit (one
//! descriptor per connection), `IP_BIND_ADDRESS_NO_PORT` for source-bound sockets, and a
//! process's resident set size and CPU time from `/proc/PID/{status,stat}` (to size
//! per-connection memory and what a run cost the gateway).

use std::os::fd::AsRawFd;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Asks the kernel to choose the local port at `connect()` (against the whole 4-tuple)
/// instead of at `bind()`, so a source address is not limited by ports it bound but
/// never used. Best effort: older kernels just ignore the failure.
pub fn bind_address_no_port(socket: &impl AsRawFd) {
    let one: libc::c_int = 1;
    // SAFETY: a plain setsockopt on a socket we own, with a correctly sized int option.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A system-wide `TcpExt` counter from `/proc/net/netstat` (e.g. `ListenOverflows`).
pub fn tcp_ext_counter(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    parse_tcp_ext(&text, name)
}

fn parse_tcp_ext(text: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let i = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// `VmRSS` of process `pid` (`"self"` for this one) in bytes, if readable.
pub fn vm_rss_bytes(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    parse_status_kb(status, "VmRSS:")
}

fn parse_status_kb(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One reading of a process: CPU time and memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// User and system CPU seconds since the process started.
    pub user_s: f64,
    pub sys_s: f64,
    /// Resident set size now, and its peak since the process started (`VmHWM`).
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
}

/// Reads `/proc/PID/stat` (utime, stime) and `/proc/PID/status` (VmRSS, VmHWM).
pub fn proc_sample(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    let (utime, stime) = parse_stat_times(&stat)?;
    Some(ProcSample {
        user_s: utime as f64 / tck,
        sys_s: stime as f64 / tck,
        rss_bytes: parse_status_kb(&status, "VmRSS:")?,
        hwm_bytes: parse_status_kb(&status, "VmHWM:")?,
    })
}

/// `utime` and `stime` (clock ticks): fields 14 and 15 of `/proc/PID/stat`, counted
/// after the command name, which is in parentheses and may itself hold spaces.
fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace();
    // After ")": field 3 (state) is the first; utime is field 14.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        let s = "Name:\tx\nVmPeak:\t  100 kB\nVmRSS:\t    2048 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss(s), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert!(vm_rss_bytes("self").unwrap() > 0);
    }

    #[test]
    fn parses_stat_times_and_samples_self() {
        let stat = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 500 0 0 0 \
                    731 204 0 0 20 0 8 0 100 1000000 2000 18446744073709551615";
        assert_eq!(parse_stat_times(stat), Some((731, 204)));
        assert_eq!(parse_stat_times("garbage"), None);
        let s = proc_sample("self").unwrap();
        assert!(s.rss_bytes > 0 && s.hwm_bytes >= s.rss_bytes, "{s:?}");
        assert!(s.user_s >= 0.0 && s.sys_s >= 0.0);
        assert!(proc_sample("999999999").is_none());
    }

    #[test]
    fn parses_tcp_ext() {
        let s = "TcpExt: SyncookiesSent ListenOverflows\nTcpExt: 3 17\nIpExt: A\nIpExt: 1\n";
        assert_eq!(parse_tcp_ext(s, "ListenOverflows"), Some(17));
        assert_eq!(parse_tcp_ext(s, "Nope"), None);
    }
}
